"""The KVCache store: a DRAM arena over an SSD tier, content-addressed and checksummed, with two transports.

Workers use :class:`crescent.services.kvstore.client.KvStoreClient`; ``crescent serve kvstore`` runs
:func:`crescent.services.kvstore.server.serve`.
"""
