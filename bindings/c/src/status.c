/* npctalk_status <-> the protocol's error codes (PROTOCOL.md "Errors"; engine/protocol.py ErrorCode). */
#include <string.h>

#include "client.h"

static const struct {
    npctalk_status status;
    const char *name;
} NAMES[] = {
    {NPCTALK_OK, "ok"},
    {NPCTALK_E_BAD_REQUEST, "bad_request"},
    {NPCTALK_E_UNSUPPORTED_VERSION, "unsupported_version"},
    {NPCTALK_E_UNKNOWN_OP, "unknown_op"},
    {NPCTALK_E_UNKNOWN_NPC, "unknown_npc"},
    {NPCTALK_E_TOO_LARGE, "too_large"},
    {NPCTALK_E_BUSY, "busy"},
    {NPCTALK_E_TIMEOUT, "timeout"},
    {NPCTALK_E_INTERNAL, "internal"},
    /* found on the client's side of the socket; never sent by the server */
    {NPCTALK_E_UNAVAILABLE, "unavailable"},
    {NPCTALK_E_PROTOCOL, "protocol"},
    {NPCTALK_E_INVALID_ARGUMENT, "invalid_argument"},
    {NPCTALK_E_NO_MEMORY, "no_memory"},
    {NPCTALK_E_SOCKET, "socket"},
};

#define SERVER_CODES 9 /* NAMES[1..8] are the codes a server sends */

const char *npctalk_status_name(npctalk_status status) {
    for (size_t i = 0; i < sizeof NAMES / sizeof NAMES[0]; i++)
        if (NAMES[i].status == status) return NAMES[i].name;
    return "unknown_status";
}

npctalk_status status_from_code_n(const char *code, size_t len) {
    for (size_t i = 1; code != NULL && i < SERVER_CODES; i++)
        if (strlen(NAMES[i].name) == len && memcmp(NAMES[i].name, code, len) == 0) return NAMES[i].status;
    return NPCTALK_E_INTERNAL; /* a code from a newer server: treat as the server's own failure */
}

npctalk_status npctalk_status_from_code(const char *code) {
    return status_from_code_n(code, code ? strlen(code) : 0);
}
