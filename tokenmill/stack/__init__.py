"""The embedded local stack: broker, Redis and tokenmill services as child processes."""
