"""The job's Zarr store: where it is, what it holds, how chunks are read and written.

``location`` parses what the user gives (path, URL + storage options, zarr
Store) once, into the picklable ``StoreLocation`` that tasks carry;
``layout`` creates and opens the arrays; ``chunkio`` is the interface that
moves chunk bytes, with two implementations chosen by capability:
``localfiles`` (plain chunks of a local store, straight on the files) and
``zarrio`` (anything else, through zarr); ``jobstate`` keeps the
fingerprint, the lease and progress; ``generated`` and ``random_inputs``
make inputs.
"""
