"""Jobs and queues: the job model, the queue protocol, and its Redis Streams and in-process implementations."""
