"""The order-center clusters: HTTP client, DNS, health, routing, what answers mean."""
