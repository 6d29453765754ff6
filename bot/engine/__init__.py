"""The job engine: scheduler, worker processes, job kinds."""
