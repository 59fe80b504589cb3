-- KEYS: held, leases, leasev. ARGV: id. Releasing an id never taken is a no-op.
release(KEYS[1], KEYS[2], KEYS[3], ARGV[1]) return 'ok'
