"""One request pipeline for every protocol: admission -> decode -> batch -> run -> head."""
