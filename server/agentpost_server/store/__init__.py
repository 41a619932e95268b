"""Ports' Redis adapters. Redis exceptions never leave this package."""
