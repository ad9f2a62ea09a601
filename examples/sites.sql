-- The table examples/sites_endpoint.py serves: one row per site, like the application's
-- MqttConnection rows. Columns map one to one to the keys of a site in the sites document
-- (docs/configuration.md); NULL means "the exporter's default". No password column: the
-- document names where the password is (password_env or password_file), never the password.
--
--   python3 examples/sites_endpoint.py --db sites.db --init examples/sites.sql

CREATE TABLE IF NOT EXISTS mqtt_connection (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,   -- [A-Za-z0-9_-]+: label, client ID, status topic
    host          TEXT    NOT NULL,
    port          INTEGER,                   -- NULL: 1883, or 8883 with TLS
    protocol      TEXT,                      -- '3.1.1' or '5'; NULL: 3.1.1
    username      TEXT,
    password_env  TEXT,                      -- environment variable of the exporter
    password_file TEXT,                      -- or a file the exporter can read
    topics        TEXT,                      -- JSON list of topic filters; NULL: ["<name>/#"]
    keepalive     INTEGER,
    tls           INTEGER NOT NULL DEFAULT 0, -- 1: TLS verified with the system CAs
    enabled       INTEGER NOT NULL DEFAULT 1  -- 0: kept in the document, no connection
);

INSERT OR IGNORE INTO mqtt_connection (name, host, port, protocol, topics)
VALUES ('site_88', '127.0.0.1', 18830, '3.1.1', NULL);

INSERT OR IGNORE INTO mqtt_connection (name, host, port, protocol, username, password_env,
                                       topics, keepalive)
VALUES ('site_42', '127.0.0.1', 18830, '5', 'exporter', 'SITE_42_MQTT_PASSWORD',
        '["site_42/sensors/#"]', 30);
