"""The operator console: the admin's home page as a dashboard of nodes, live sessions, jobs,
exports and certificates, kept live by small htmx partial updates (`views`), built from what
`overview` reads out of the database and the workers' reports in Redis."""
