"""Development tools, not the service: a local Samples API (`sandbox`), a local Kafka broker (`localkafka`),
generated wearable data (`generate`) and the end-to-end demo (`demo`), behind `stream sandbox`, `stream kafka`,
`stream generate` and `stream demo`.

The service never imports this subpackage: only stream/cli.py does, lazily, inside those commands' branches
(tests/unit/test_layout.py checks it)."""
