"""Conversions between CrypTen secret shares and BFV ciphertexts (DESIGN section 3).

Both functions are SPMD: the server and the client call them at the same
point of the protocol with their own ``Party``; CrypTen's communicator carries
the share arithmetic, ``party.channel`` the ciphertexts and masked vectors.

Numbers: CrypTen shares live in Z_{2^64} with ``CRYPTEN_FRAC_BITS`` = 16
fractional bits; HE plaintexts live in Z_p (p the BFV batching prime), values
centred in (-p/2, p/2) with a per-use number of fractional bits.

shares -> HE (``shares_to_he``), one message each way, no comparison:
  server draws s uniform in Z_{2^64} and sends  u = x_server + s  to the client;
  the client computes z = x_client + u = x + s (mod 2^64): a uniform value,
  perfectly hiding x. Both truncate their value by the same number of bits
  (z >> k, s >> k, read as unsigned) and reduce mod p; the client encrypts
  its value in the kernel's input layout, the server subtracts its own from
  the ciphertext. Result: Enc(x >> k) up to one unit in the last place.
  This deviates from DESIGN section 3 (which opens (x + s) mod p computed in
  CrypTen with comparisons): hiding is still perfect, and the only cost is a
  correctness failure when x + s wraps 2^64, probability |x| / 2^64 (below
  2^-40 for every activation we convert), the same failure CrypTen accepts in
  its own two-party truncation. It saves the comparison rounds of every
  conversion.

HE -> shares (``he_to_shares`` = ``he_to_zp`` then ``zp_to_shares``), one
message plus one multiplication of bits:
  ``he_to_zp``: the server adds a uniform r' in Z_p to every slot of the
  result ciphertext as a fresh public-key encryption and floods the noise
  (``ServerHE.mask_for_client``: the client sees neither the result's c1 nor
  its noise, both functions of the weights), and sends it; the client
  decrypts y + r', the server keeps -r'. These are additive shares over Z_p;
  any such sharing of small values with a uniform server share converts the
  same way (``protocol/shared_matmul.py`` sums several before converting).
  ``zp_to_shares``: with H = floor(p/4), the centred y (|y| < p/4) becomes
  v = y + H in [0, h), h = (p+1)/2; the server's share is rewritten as a mask
  r = -(its share + H), so the client's a = (v + r) mod p, uniform in Z_p.
  Then y = a - r - H + p * wrap over the integers, with wrap = [v + r >= p].
  Because v < h, the wrap is a product of one bit each party knows:

      wrap = [r >= h] AND [a < h]

  (r < h: v + r < 2h - 1 = p, no wrap; r >= h: the sum wraps exactly when
  a = v + r - p < v < h, and otherwise a >= r >= h; the test checks every
  case for a small prime). Each bit alone is uniform and independent of v.
  So the conversion costs one multiplication of two private bits (one
  Beaver triple, one round) instead of a 64-bit secure comparison. Every
  slot is masked, not only the output slots: slots outside the output hold
  partial sums of the server's weights.
"""

from __future__ import annotations

import numpy as np
import torch

from ..crypten_compat import import_crypten
from ..mpc.runtime import CLIENT, SERVER, rank_of
from .randomness import uniform_mod, uniform_ring64
from .wire import pack_array, pack_blobs, unpack_array, unpack_blobs

CRYPTEN_FRAC_BITS = 16


def _mpc():
    return import_crypten().mpc


def _check_frac_bits(frac_bits: int):
    if not 0 <= frac_bits <= 40:
        raise ValueError(f"fractional bits must be in [0, 40], got {frac_bits}")


def shares_to_zp(party, x, frac_bits: int) -> np.ndarray:
    """Secret-shared ``x`` (an MPCTensor, 16 fractional bits) -> a masked form
    over Z_p with ``frac_bits`` fractional bits, one message: the client gets
    z = (x + s) >> k mod p, uniform, the server s >> k mod p, so that
    x >> k = z - s (mod p) up to one unit in the last place. Both as uint64
    arrays, flattened in C order."""
    _check_frac_bits(frac_bits)
    if frac_bits > CRYPTEN_FRAC_BITS:
        raise ValueError(f"cannot add precision in a conversion ({frac_bits} > {CRYPTEN_FRAC_BITS} bits)")
    shift = np.uint64(CRYPTEN_FRAC_BITS - frac_bits)
    p = np.uint64(party.he.p)
    share = x.share.detach().reshape(-1).cpu().numpy().astype(np.int64)
    if party.is_server:
        s = uniform_ring64(share.size)
        party.channel.send("to_he.masked_share", pack_array(share + s))  # int64 adds wrap mod 2^64
        return (s.view(np.uint64) >> shift) % p
    masked = unpack_array(party.channel.recv_payload("to_he.masked_share"), share.size, "masked share")
    z = (share + masked).view(np.uint64)  # x + s mod 2^64, uniformly distributed
    return (z >> shift) % p


def shares_to_he(party, x, layout, frac_bits: int):
    """Secret-shared ``x`` (an MPCTensor) -> ciphertexts at the server, laid out for a kernel.

    Args:
        party: this process's :class:`~cryptogen_hf.protocol.party.Party`.
        x: CrypTen MPCTensor with 16 fractional bits; flattened in C order.
        layout: object with ``pack_input(values_mod_p) -> list[np.ndarray]`` giving
            the slot vectors (a linear placement: copies and zeros only).
        frac_bits: fractional bits the kernel wants (<= 16).

    Returns: the server's list of ciphertexts Enc(x); ``None`` at the client.
    """
    masked = shares_to_zp(party, x, frac_bits)
    if party.is_server:
        blobs = unpack_blobs(party.channel.recv_payload("to_he.ciphertexts"))
        ciphertexts = [party.he.load_ct(blob) for blob in blobs]
        masks = layout.pack_input(masked)
        if len(masks) != len(ciphertexts):
            raise ValueError(f"client sent {len(ciphertexts)} ciphertexts, layout expects {len(masks)}")
        return [party.he.sub_plain(ct, mask) for ct, mask in zip(ciphertexts, masks)]
    slots = layout.pack_input(masked)
    party.channel.send("to_he.ciphertexts", pack_blobs([party.he.encrypt_serialized(v) for v in slots]))
    return None


def he_to_zp(party, ciphertexts, layout, n: int) -> np.ndarray:
    """Ciphertexts at the server -> additive shares over Z_p of the ``n`` values
    ``layout.unpack_output`` gathers (uint64): the server re-randomises and
    floods each ciphertext and adds a uniform mask r to every slot, the client
    decrypts. Client: y + r; server: -r (mod p). One message."""
    p = int(party.he.p)
    if party.is_server:
        masks, blobs = [], []
        for ct in ciphertexts:
            r = uniform_mod(p, party.he.slot_count)
            masks.append(r)
            blobs.append(party.he.serialize_ct(party.he.mask_for_client(ct, r)))
        party.channel.send("from_he.ciphertexts", pack_blobs(blobs))
        r = np.asarray(layout.unpack_output(masks), dtype=np.uint64).reshape(-1)
        local = (np.uint64(p) - r) % np.uint64(p)
    else:
        blobs = unpack_blobs(party.channel.recv_payload("from_he.ciphertexts"))
        slots = [party.he.decrypt(party.he.load_ct(blob)) for blob in blobs]
        local = np.asarray(layout.unpack_output(slots), dtype=np.uint64).reshape(-1)
    if local.size != n:
        raise ValueError(f"layout produced {local.size} outputs, expected {n}")
    return local


def zp_to_shares(party, local, frac_bits: int, server_addend=None):
    """Additive shares over Z_p of small values -> CrypTen shares (16 fractional bits).

    ``local`` (uint64, this party's share; client a, server b, a + b = y mod p)
    holds values y with |y| < p/4 and ``frac_bits`` fractional bits; the
    server's share must be uniform in Z_p (it is whenever a fresh mask went
    into it, as in :func:`he_to_zp`), since the client's share then hides y.
    One multiplication of two private bits (module docstring).

    server_addend: optional int array with ``frac_bits`` fractional bits that
        the server adds to its own share (a bias it owns): free, no round.
    """
    _check_frac_bits(frac_bits)
    mpc = _mpc()
    p = int(party.he.p)
    shift, h = p // 4, (p + 1) // 2
    local = np.asarray(local, dtype=np.uint64).reshape(-1)
    if party.is_server:
        # r = -(b + H): then a = (y + H) + r with y + H in [0, h).
        masked_value = (np.uint64(2 * p - shift) - local) % np.uint64(p)  # r
        signed = -(masked_value.astype(np.int64))
    else:
        masked_value = local  # a
        signed = local.astype(np.int64)

    # d = a - r over the integers, |d| < p: shares (client a, server -r), scale 1.
    d = mpc.MPCTensor.from_shares(torch.from_numpy(signed), precision=0)
    # wrap = [r >= h] (the server's bit) AND [a < h] (the client's bit).
    my_bit = torch.from_numpy((masked_value >= h) if party.is_server else (masked_value < h)).long()
    server_bit = mpc.MPCTensor(my_bit if party.is_server else torch.zeros_like(my_bit), src=rank_of(SERVER), precision=0)
    client_bit = mpc.MPCTensor(my_bit if party.is_client else torch.zeros_like(my_bit), src=rank_of(CLIENT), precision=0)
    wrapped = server_bit * client_bit  # exact: both have encoder scale 1
    y = d + wrapped * p - shift  # y * 2^frac_bits, exact
    if party.is_server and server_addend is not None:
        # Adding a value to one's own additive share adds it to the secret.
        addend = torch.as_tensor(np.asarray(server_addend, dtype=np.int64).reshape(-1))
        y._tensor.share = y._tensor.share + addend
    if frac_bits > CRYPTEN_FRAC_BITS:
        y = y.div(1 << (frac_bits - CRYPTEN_FRAC_BITS))  # CrypTen's two-party local truncation
    elif frac_bits < CRYPTEN_FRAC_BITS:
        y = y * (1 << (CRYPTEN_FRAC_BITS - frac_bits))
    return mpc.MPCTensor.from_shares(y.share, precision=CRYPTEN_FRAC_BITS)


def he_to_shares(party, ciphertexts, layout, frac_bits: int, n: int, server_addend=None):
    """Ciphertexts at the server -> secret shares (MPCTensor, 16 fractional bits) of the ``n`` outputs.

    Args:
        ciphertexts: the server's list of result ciphertexts (ignored at the client).
        layout: object with ``unpack_output(list of slot vectors) -> np.ndarray`` that
            GATHERS the n output slots (no arithmetic, so it applies to masks too).
        frac_bits: fractional bits of the plaintext values in the ciphertexts.
        n: number of output values (public).
        server_addend: as in :func:`zp_to_shares`.
    """
    return zp_to_shares(party, he_to_zp(party, ciphertexts, layout, n), frac_bits, server_addend)
