"""Foundations every part uses: errors, file I/O, typed configs, process set-up."""
