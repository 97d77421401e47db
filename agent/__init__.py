"""Order Edge Agent: a store-and-forward agent that sits beside an order center."""

__version__ = "0.1.0"
