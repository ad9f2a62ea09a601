"""mqtt-site-exporter: one supervised MQTT connection per site, visible to Prometheus."""

__version__ = "0.1.0"
