"""Shared pytest setup: the repo root on sys.path, deterministic CPU threads."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
