"""What a browser or an API client talks to: pages, htmx fragments, the JSON API, forms and
the answers every request gets (middleware). Views find runs and memberships through
runs/access.py and change runs only through the models' verbs."""
