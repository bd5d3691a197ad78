"""Table reservations at a restaurant: docs/build-a-service.md builds it step by step."""
