"""Memory plans, hardware profiles and the roofline cost model."""
