"""The playground page served at ``/``: plain HTML, CSS and JavaScript, no build step.

``index.html`` loads ``app.js`` (the UI), which uses ``api.js`` (fetch, fetch-based SSE with reconnect and a
polling fallback, plain-words errors) and ``figures.js`` (PSNR from canvas pixels, formatting, SVG charts).
Everything talks to the public HTTP API only.
"""
