"""Tests of the on-device agent."""
