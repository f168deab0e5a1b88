"""Small helpers with one home each: time, hashing, backoff, worker threads, plug-in discovery."""
