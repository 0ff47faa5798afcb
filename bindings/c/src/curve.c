/*
 * CURVE key files: the ZeroMQ certificate format `npctalk keygen` writes (pyzmq's
 * zmq.auth.create_certificates), e.g.
 *
 *     curve
 *         public-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
 *         secret-key = "JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6"
 *
 * Only the two key lines matter; comments and metadata are skipped.
 */
#include <stdio.h>
#include <string.h>

#include "npctalk/npctalk.h"

#define Z85_KEY_CHARS 40

/* `value` gets the quoted 40-character key after "NAME =" on `line`; 1 when found. */
static int key_on_line(const char *line, const char *name, char value[Z85_KEY_CHARS + 1]) {
    while (*line == ' ' || *line == '\t') line++;
    size_t n = strlen(name);
    if (strncmp(line, name, n) != 0) return 0;
    const char *open = strchr(line + n, '"');
    const char *close = open ? strchr(open + 1, '"') : NULL;
    if (close == NULL || close - open - 1 != Z85_KEY_CHARS) return 0;
    memcpy(value, open + 1, Z85_KEY_CHARS);
    value[Z85_KEY_CHARS] = '\0';
    return 1;
}

static npctalk_status read_certificate(const char *path, char public_key[Z85_KEY_CHARS + 1],
                                       char secret_key[Z85_KEY_CHARS + 1], char *error, size_t cap) {
    FILE *file = path ? fopen(path, "r") : NULL;
    if (file == NULL) {
        if (error) snprintf(error, cap, "CURVE key file %s cannot be read; create keys with `npctalk keygen DIR "
                                        "--name NAME`.", path ? path : "(NULL)");
        return NPCTALK_E_INVALID_ARGUMENT;
    }
    char line[256];
    public_key[0] = '\0';
    if (secret_key) secret_key[0] = '\0';
    while (fgets(line, sizeof line, file)) {
        key_on_line(line, "public-key", public_key);
        if (secret_key) key_on_line(line, "secret-key", secret_key);
    }
    fclose(file);
    const char *missing = public_key[0] == '\0' ? "a public-key" : secret_key && secret_key[0] == '\0' ? "a secret-key" : NULL;
    if (missing) {
        if (error) snprintf(error, cap, "%s holds no %s line of 40 Z85 characters%s.", path, missing,
                            secret_key ? "; pass the NAME.key_secret file, not the public NAME.key" : "");
        return NPCTALK_E_INVALID_ARGUMENT;
    }
    return NPCTALK_OK;
}

npctalk_status npctalk_load_curve_keys(const char *server_key_file, const char *client_secret_file,
                                       npctalk_curve_keys *keys, char *error, size_t error_cap) {
    if (keys == NULL) {
        if (error) snprintf(error, error_cap, "npctalk_load_curve_keys needs somewhere to put the keys.");
        return NPCTALK_E_INVALID_ARGUMENT;
    }
    memset(keys, 0, sizeof *keys);
    npctalk_status status = read_certificate(server_key_file, keys->server_key, NULL, error, error_cap);
    if (status == NPCTALK_OK)
        status = read_certificate(client_secret_file, keys->public_key, keys->secret_key, error, error_cap);
    if (status != NPCTALK_OK) memset(keys, 0, sizeof *keys);
    return status;
}
