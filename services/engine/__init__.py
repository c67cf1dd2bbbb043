"""What every engine of a worker shares and depends on nothing else of services: its Prometheus
metrics (`metrics`). A leaf: the prefill and decode engines, the KV transfer and the worker's
adapters all import it, and it imports none of them."""
