"""edgefleet: run ML models on fleets of edge devices."""

__version__ = "0.2.0"
