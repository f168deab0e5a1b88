"""What happens to a frame or window before and after inference."""
