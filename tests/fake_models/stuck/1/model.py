"""A model that never finishes unloading: its finalize sleeps for an hour."""
import time


class TritonPythonModel:
    def execute(self, requests):
        return []

    def finalize(self):
        time.sleep(3600)
