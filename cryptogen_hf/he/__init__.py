"""BFV homomorphic-encryption layer of CryptoGen (on tenseal.sealapi).

params    HEParams: ring, batching prime p, 128-bit-secure q, fingerprint()
keys      ClientHE (secret key owner) / ServerHE (from the public bundle only)
noise     NoiseModel: server-side conservative noise-budget estimates
flooding  re-randomising and noise-flooding what the client decrypts (circuit privacy)
ole       cross products for the two-party Beaver triples
matvec    MatvecPlan (BSGS diagonals; one token, or several per ciphertext for a pass)
attention OuterAttentionPlan + OuterKVCache (prefill), InnerKVCache (decode tokens)
"""

from .attention import InnerKVCache, OuterAttentionPlan, OuterKVCache
from .keys import CiphertextError, ClientHE, PlaintextEncoder, ServerHE
from .matvec import MatvecPlan
from .noise import NoiseModel
from .params import HEParams

__all__ = [
    "HEParams", "ClientHE", "ServerHE", "PlaintextEncoder", "CiphertextError", "NoiseModel",
    "MatvecPlan", "OuterAttentionPlan", "OuterKVCache", "InnerKVCache",
]
