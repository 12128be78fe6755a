"""The watcher: the process (or the server's embedded task) that starts runs at providers,
follows their streams and records what each provider says, through the models' verbs."""
