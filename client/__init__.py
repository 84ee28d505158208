"""fedcare.client."""
