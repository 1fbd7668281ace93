import time, numpy as np, secrets
from cryptogen_hf.mpc.ot import *
from cryptogen_hf.mpc.prg import AESCounterPRG
rng=np.random.default_rng(0)
cols=rng.integers(0,256,(128,64),dtype=np.uint8)
rows=transpose_columns(cols)
ref=np.packbits(np.unpackbits(cols,axis=1,bitorder='little').T,axis=1,bitorder='little')
assert np.array_equal(rows,ref), "transpose"
# OT
s=rng.integers(0,2,128).astype(np.uint8)
k0=np.frombuffer(secrets.token_bytes(128*32),dtype=np.uint8).reshape(128,32)
k1=np.frombuffer(secrets.token_bytes(128*32),dtype=np.uint8).reshape(128,32)
chosen=np.where(s[:,None]==1,k1,k0)
R=OTExtensionReceiver(k0,k1,AESCounterPRG()); S=OTExtensionSender(s,chosen)
for m in (64, 1<<19):
    t0=time.perf_counter(); u,r,mr=R.extend(m); t1=time.perf_counter(); m0,m1=S.extend(u,m); t2=time.perf_counter()
    assert np.array_equal(np.where(r==1,m1,m0),mr)
    print(m, 'recv %.3f send %.3f'%(t1-t0,t2-t1), 'bias', m0.mean(), m1.mean(), r.mean(), (m0^m1).mean())
t0=time.perf_counter(); rows=transpose_columns(np.zeros((128,1<<16),np.uint8)); print('transpose 2^19', time.perf_counter()-t0)
t0=time.perf_counter(); hash_low_bits(rows,0); print('hash 2^19', time.perf_counter()-t0)
