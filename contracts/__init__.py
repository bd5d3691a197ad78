"""Contracts: read out of compiled descriptors, generated, stamped, checked."""
