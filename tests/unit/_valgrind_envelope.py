"""Exercise the native module under valgrind memcheck (see test_native_valgrind.py)."""

import os

from broker.envelope import KeySlot, rewrap_batch

key = KeySlot(bytearray(os.urandom(32)), os.urandom(16), 1)
k2 = KeySlot(bytearray(os.urandom(32)), os.urandom(16), 2)
items = [os.urandom(i) for i in range(200)]
env = key.seal_batch(items, b"aad")
assert key.open_batch(env, b"aad") == items
bad = [e[:-1] + bytes([e[-1] ^ 1]) for e in env[:20]] + [b"", b"junk", env[0][:40]]
assert all(x is None for x in key.open_batch(bad, b"aad"))
rw = rewrap_batch(key, k2, env, b"aad")
assert k2.open_batch(rw, b"aad") == items
h = KeySlot.for_hmac(os.urandom(32), os.urandom(16), 1)
tag = h.mac(b"m")
assert h.verify_mac(b"m", tag)
assert not h.verify_mac(b"n", tag)
assert key.open(key.seal(b"small", b"a"), b"a") == b"small"
big = os.urandom(70000)
assert key.open(key.seal(big)) == big
for slot in (key, k2, h):
    slot.close()
print("ok")
