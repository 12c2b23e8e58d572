"""What operators watch: Prometheus metrics, the drift feed and monitor, the dashboard."""
