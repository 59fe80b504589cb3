"""Redis plumbing shared by the Redis stores: clients, the call guard, the Lua scripts.

The stores themselves live with their concern (:mod:`gateway.quota.redis`,
:mod:`gateway.cache.redis`, :mod:`gateway.images.redis`, :mod:`gateway.abuse.redis`).
redis-py is imported only in Redis mode, so an edge box does not need it.
"""
