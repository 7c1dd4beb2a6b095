"""One router per resource; each is thin: parse, call the job service, shape the answer."""
