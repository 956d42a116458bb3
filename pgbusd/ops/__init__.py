"""What operators see and use: the status document, Prometheus metrics, systemd's notify
protocol, and the structured log."""
