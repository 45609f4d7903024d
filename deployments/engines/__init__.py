"""Model code with no Ray in it: loading, precision, encoding, scoring and decoding."""
