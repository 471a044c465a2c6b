"""The delivery engine: claim due enrollments in batches, execute the step, advance."""
