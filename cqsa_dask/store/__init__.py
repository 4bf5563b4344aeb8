"""The job's Zarr store: where it is, what it holds, how chunks are read and written.

``location`` parses what the user gives (path, URL, zarr Store) once;
``layout`` creates and opens the arrays; ``chunkio`` moves chunk bytes (a
local-files fast path, zarr otherwise); ``jobstate`` keeps the fingerprint,
the lease and progress; ``generated`` and ``random_inputs`` make inputs.
"""
