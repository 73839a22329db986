"""jobfeed's benchmark harness: ``python -m bench [--quick]``.

The server runs as its own process from a clean database per workload; load generators run in
other processes (asyncio + uvloop + aiohttp); every figure is set beside a ceiling measured by
the same script on the same machine (raw SQLite group commit, a raw aiohttp WebSocket server).
"""
