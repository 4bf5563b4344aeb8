"""What runs on the workers and how it is scheduled: the task bodies, the
partials policies, the worker runtime, the Dask graph and the telemetry the
tasks send to the dashboard."""
