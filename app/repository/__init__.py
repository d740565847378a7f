"""The model repository: the versions served, where they come from, how each is opened, which
a policy serves, and how every worker applies one change."""
