"""The live state of a running server: the risk list and policy in force, the stored population in memory, the
last published statuses and their diff, and the ingest queue that commits to the store and merges into the view.
"""
