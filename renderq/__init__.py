"""renderq's domain: jobs and their lifecycle, billing, notifications, the broker and the
generator client. It knows neither Flask's request nor Celery's task decorators: `webapp/`
puts it behind HTTP, `tasks/` behind Celery."""
