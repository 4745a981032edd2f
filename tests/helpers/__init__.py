"""Model and input builders shared by the tests."""
