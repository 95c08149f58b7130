"""Shared test plumbing: real databases cloned from a migrated template."""
