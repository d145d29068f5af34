"""`studio serve`: warm models behind a local HTTP API, and a gallery of every output.

Read top to bottom: security.py (who may ask for what: token, hosts, paths, limits, CSP),
cache.py (loaded models kept warm, least recently used evicted under a memory budget), jobs.py
(the queue, its one worker thread, progress events, cancel), gallery.py (the output folders'
manifests and sidecars as one index, thumbnails), app.py (the routes), client.py (what
`studio image --server URL` uses; imports no torch and no web framework). The server sits on
top of the engine like the CLI does (ARCHITECTURE.md's layers): jobs run through Engine.plan /
Engine.execute, so a job and a command line with the same parameters make the same files.
"""
