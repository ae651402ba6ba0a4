"""The rules (SPEC §2-§4): time base, policy, regions and the risk list, the population columns, the result schema,
and the engine that runs the Cython kernel (or the plain-Python reference) over Arrow batches.

Pure computation: nothing here opens a database, a socket or a thread pool.  Every other layer builds on this one.
"""
