"""The bus: every Redis connection, the hot path's lean client and appender, the consumer
loop shared by the model worker and the log bin, stream retention, the embedded server."""
