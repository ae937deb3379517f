"""stream: Kafka -> validated, per-user batches -> the Samples API, with offsets committed after acceptance."""

__version__ = "0.2.0"
