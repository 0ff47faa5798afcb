/*
 * API behaviour of the C client that the talk example cannot reach, checked against a real server.
 * Built and run by test_c_client.py:  api_checks ENDPOINT CHECK
 * Prints "ok" and exits 0 when the check holds; otherwise prints why and exits 1.
 * The "recover" check talks to the test over stdio: it prints "streaming" once a token arrived
 * (the test then freezes the server), "lost" when the reply failed (the test thaws it), and waits
 * for a line on stdin before saying the next line on the same client. "stall" and "dropped" stop
 * polling after their first line until a line arrives on stdin.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <msgpack.h>

#include "npctalk/npctalk.h"

#define CHECK(cond, ...)                                                          \
    do {                                                                          \
        if (!(cond)) {                                                            \
            printf("FAILED %s:%d: ", __FILE__, __LINE__);                         \
            printf(__VA_ARGS__);                                                  \
            printf("\n");                                                         \
            exit(1);                                                              \
        }                                                                         \
    } while (0)

typedef struct reply_state {
    npctalk_client *client;
    char text[8192];
    size_t len;
    int tokens, done, failed;
    npctalk_status status;
    char finish_reason[16];
    int then_say;           /* on_done starts another reply from inside the callback */
    struct reply_state *next;
    int close_on_token;     /* npctalk_close from inside on_token */
    int reenter_on_token;   /* blocking call / poll from inside on_token */
    npctalk_status reentered_call, reentered_poll;
} reply_state;

static void on_token(void *user, npctalk_reply_id reply, const char *text, size_t len, uint32_t seq) {
    reply_state *s = user;
    (void)reply;
    CHECK(seq == (uint32_t)s->tokens, "token seq %u after %d tokens", seq, s->tokens);
    if (s->len + len < sizeof s->text) {
        memcpy(s->text + s->len, text, len);
        s->len += len;
    }
    s->tokens++;
    if (s->reenter_on_token && s->tokens == 1) {
        s->reentered_call = npctalk_ping(s->client);
        s->reentered_poll = npctalk_poll(s->client, 0);
    }
    if (s->close_on_token && s->tokens == 1) npctalk_close(s->client);
}

static npctalk_say_options short_reply(const char *player, int tokens);

static void on_done(void *user, const npctalk_result *r) {
    reply_state *s = user;
    CHECK(r->text_len == s->len && memcmp(r->text, s->text, s->len) == 0, "done text differs from the tokens");
    snprintf(s->finish_reason, sizeof s->finish_reason, "%s", r->finish_reason);
    s->done = 1;
    if (s->then_say) {
        npctalk_callbacks callbacks = {on_token, on_done, NULL, s->next};
        npctalk_say_options o = short_reply("api-chain-2", 6);
        npctalk_status status = npctalk_say(s->client, "bram", "And then?", &o, &callbacks, NULL);
        CHECK(status == NPCTALK_OK, "say from on_done: %s", npctalk_last_error(s->client));
    }
}

static void on_error(void *user, npctalk_reply_id reply, npctalk_status status, const char *message) {
    reply_state *s = user;
    (void)reply;
    (void)message;
    s->failed = 1;
    s->status = status;
}

static npctalk_say_options short_reply(const char *player, int tokens) {
    npctalk_say_options o = npctalk_say_defaults();
    o.player = player;
    o.max_new_tokens = tokens;
    return o;
}

static npctalk_client *connect_or_die(const char *endpoint, int timeout_ms) {
    npctalk_options options = npctalk_default_options();
    options.timeout_ms = timeout_ms;
    npctalk_client *c = NULL;
    CHECK(npctalk_connect(endpoint, &options, &c) == NPCTALK_OK, "connect: %s", npctalk_connect_error());
    return c;
}

static void wait_all(npctalk_client *c) {
    for (int i = 0; i < 3000 && npctalk_running(c) > 0; i++) CHECK(npctalk_poll(c, 10) == NPCTALK_OK, "poll failed");
    CHECK(npctalk_running(c) == 0, "replies still running after 30 s");
}

/* Bad arguments fail at once with a sentence, and no callback runs. */
static void check_arguments(const char *endpoint) {
    npctalk_options bad = npctalk_default_options();
    npctalk_client *c = NULL;
    bad.timeout_ms = 0;
    CHECK(npctalk_connect(endpoint, &bad, &c) == NPCTALK_E_INVALID_ARGUMENT && c == NULL, "timeout 0 accepted");
    CHECK(strstr(npctalk_connect_error(), "timeout_ms") != NULL, "connect error: %s", npctalk_connect_error());
    bad = npctalk_default_options();
    bad.curve_server_key = "x";
    CHECK(npctalk_connect(endpoint, &bad, &c) == NPCTALK_E_INVALID_ARGUMENT, "one CURVE key accepted");
    CHECK(strstr(npctalk_connect_error(), "all three") != NULL, "connect error: %s", npctalk_connect_error());

    c = connect_or_die(endpoint, 3000);
    reply_state s = {0};
    npctalk_callbacks callbacks = {on_token, on_done, on_error, &s};
    CHECK(npctalk_say(c, NULL, "Hi", NULL, &callbacks, NULL) == NPCTALK_E_INVALID_ARGUMENT, "NULL npc accepted");
    CHECK(npctalk_say(c, "bram", "", NULL, &callbacks, NULL) == NPCTALK_E_INVALID_ARGUMENT, "empty text accepted");
    npctalk_context_entry keyless = {NULL, NPCTALK_VALUE_STRING, "x", 0, 0.0, 0, {NULL, 0}};
    npctalk_say_options o = npctalk_say_defaults();
    o.context = &keyless;
    o.context_count = 1;
    CHECK(npctalk_say(c, "bram", "Hi", &o, &callbacks, NULL) == NPCTALK_E_INVALID_ARGUMENT, "keyless context accepted");
    CHECK(strstr(npctalk_last_error(c), "no key") != NULL, "error: %s", npctalk_last_error(c));
    CHECK(npctalk_cancel(c, 12345) == NPCTALK_E_INVALID_ARGUMENT, "cancel of an unknown reply accepted");
    CHECK(strstr(npctalk_last_error(c), "No running reply 12345") != NULL, "error: %s", npctalk_last_error(c));
    CHECK(npctalk_running(c) == 0 && s.tokens == 0 && !s.failed, "a refused say left state behind");
    npctalk_close(c);
}

/* Four replies on one client at once, each to its own callbacks, each complete and in order. */
static void check_concurrent(const char *endpoint) {
    npctalk_client *c = connect_or_die(endpoint, 3000);
    reply_state s[4] = {{0}};
    const char *players[] = {"api-c0", "api-c1", "api-c2", "api-c3"};
    for (int i = 0; i < 4; i++) {
        npctalk_callbacks callbacks = {on_token, on_done, on_error, &s[i]};
        npctalk_say_options o = short_reply(players[i], 20);
        CHECK(npctalk_say(c, i % 2 ? "elda" : "bram", "Good day!", &o, &callbacks, NULL) == NPCTALK_OK, "say %d", i);
    }
    CHECK(npctalk_running(c) == 4, "running %zu, not 4", npctalk_running(c));
    wait_all(c);
    for (int i = 0; i < 4; i++)
        CHECK(s[i].done && s[i].tokens > 0 && strcmp(s[i].finish_reason, "length") == 0, "reply %d: done %d tokens %d",
              i, s[i].done, s[i].tokens);
    npctalk_close(c);
}

/* Callbacks may start replies; blocking calls and poll from a callback are refused. */
static void check_reentry(const char *endpoint) {
    npctalk_client *c = connect_or_die(endpoint, 3000);
    reply_state second = {0};
    reply_state first = {0};
    first.client = second.client = c;
    first.then_say = 1;
    first.next = &second;
    first.reenter_on_token = 1;
    npctalk_callbacks callbacks = {on_token, on_done, on_error, &first};
    npctalk_say_options o = short_reply("api-chain-1", 6);
    CHECK(npctalk_say(c, "bram", "Hello.", &o, &callbacks, NULL) == NPCTALK_OK, "say");
    wait_all(c);
    CHECK(first.done && second.done && second.tokens > 0, "chained reply: first %d second %d", first.done, second.done);
    CHECK(first.reentered_call == NPCTALK_E_INVALID_ARGUMENT && first.reentered_poll == NPCTALK_E_INVALID_ARGUMENT,
          "blocking call / poll from a callback: %d / %d", first.reentered_call, first.reentered_poll);
    npctalk_close(c);
}

/* npctalk_close from a callback: deferred, no callback afterwards (ASan checks the memory). */
static void check_close_in_callback(const char *endpoint) {
    npctalk_client *c = connect_or_die(endpoint, 3000);
    reply_state s = {0};
    s.client = c;
    s.close_on_token = 1;
    npctalk_callbacks callbacks = {on_token, on_done, on_error, &s};
    npctalk_say_options o = short_reply("api-close", 40);
    CHECK(npctalk_say(c, "bram", "Hello.", &o, &callbacks, NULL) == NPCTALK_OK, "say");
    for (int i = 0; i < 3000 && s.tokens == 0; i++) CHECK(npctalk_poll(c, 10) == NPCTALK_OK, "poll");
    /* c is freed now: the poll that ran on_token returned */
    CHECK(s.tokens == 1 && !s.done && !s.failed, "callbacks after close: tokens %d done %d", s.tokens, s.done);
}

/* A reply cut by a frozen server fails; after the server is back the same client works. */
static void check_recover(const char *endpoint) {
    npctalk_client *c = connect_or_die(endpoint, 600);
    reply_state cut = {0};
    npctalk_callbacks callbacks = {on_token, on_done, on_error, &cut};
    npctalk_say_options o = short_reply("api-recover", 500);
    CHECK(npctalk_say(c, "bram", "Tell me a long story.", &o, &callbacks, NULL) == NPCTALK_OK, "say");
    while (cut.tokens == 0 && !cut.failed) CHECK(npctalk_poll(c, 10) == NPCTALK_OK, "poll");
    printf("streaming\n");
    fflush(stdout);
    for (int i = 0; i < 1000 && !cut.failed && !cut.done; i++) CHECK(npctalk_poll(c, 10) == NPCTALK_OK, "poll");
    CHECK(cut.failed && cut.status == NPCTALK_E_UNAVAILABLE, "the frozen server was not noticed (status %d)", cut.status);
    printf("lost\n");
    fflush(stdout);
    char line[16];
    CHECK(fgets(line, sizeof line, stdin) != NULL, "no go-ahead on stdin");
    reply_state after = {0};
    callbacks.user = &after;
    o = short_reply("api-recover-2", 8);
    CHECK(npctalk_say(c, "bram", "Are you back?", &o, &callbacks, NULL) == NPCTALK_OK, "say after recovery");
    wait_all(c);
    CHECK(after.done && after.tokens > 0, "no reply after the server came back (failed %d status %d)", after.failed,
          after.status);
    npctalk_close(c);
}

/* A game that stops polling (a loading screen) while the server has nothing to say keeps its
 * reply: the silence counts from the first ping after the stall, not from before it. Run against
 * the test's scripted server, which answers pings but holds the reply until told. */
static void check_stall(const char *endpoint) {
    npctalk_client *c = connect_or_die(endpoint, 400);
    reply_state s = {0};
    npctalk_callbacks callbacks = {on_token, on_done, on_error, &s};
    npctalk_say_options o = short_reply("api-stall", 8);
    CHECK(npctalk_say(c, "bram", "Hello?", &o, &callbacks, NULL) == NPCTALK_OK, "say");
    for (int i = 0; i < 50; i++) CHECK(npctalk_poll(c, 10) == NPCTALK_OK, "poll"); /* 0.5 s of frames */
    CHECK(!s.failed && npctalk_running(c) == 1, "the reply failed before the stall (status %d)", s.status);
    printf("stalling\n");
    fflush(stdout);
    char line[16];
    CHECK(fgets(line, sizeof line, stdin) != NULL, "no go-ahead on stdin"); /* the stall: no polls */
    wait_all(c);
    CHECK(s.done && !s.failed && s.tokens == 1, "the reply did not survive the stall (failed %d status %d)", s.failed,
          s.status);
    npctalk_close(c);
}

/* The connection drops underneath a running reply (the server froze past the ZMTP heartbeat
 * timeout while the game was not polling): the reply fails at once instead of waiting forever. */
static void check_dropped(const char *endpoint) {
    npctalk_client *c = connect_or_die(endpoint, 400);
    reply_state s = {0};
    npctalk_callbacks callbacks = {on_token, on_done, on_error, &s};
    npctalk_say_options o = short_reply("api-dropped", 500);
    CHECK(npctalk_say(c, "bram", "Tell me a long story.", &o, &callbacks, NULL) == NPCTALK_OK, "say");
    while (s.tokens == 0 && !s.failed) CHECK(npctalk_poll(c, 10) == NPCTALK_OK, "poll");
    printf("streaming\n");
    fflush(stdout);
    char line[16];
    CHECK(fgets(line, sizeof line, stdin) != NULL, "no go-ahead on stdin"); /* no polls meanwhile */
    wait_all(c);
    CHECK(s.failed && s.status == NPCTALK_E_UNAVAILABLE, "the lost reply did not fail (done %d status %d)", s.done,
          s.status);
    npctalk_close(c);
}

/* The value of `key` in a msgpack map, or NULL. */
static const msgpack_object *get(const msgpack_object *map, const char *key) {
    for (uint32_t i = 0; map->type == MSGPACK_OBJECT_MAP && i < map->via.map.size; i++) {
        const msgpack_object *k = &map->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == strlen(key) && memcmp(k->via.str.ptr, key, strlen(key)) == 0)
            return &map->via.map.ptr[i].val;
    }
    return NULL;
}

/* npctalk_call reaches the ops without a function of their own, and maps their errors. */
static void check_call(const char *endpoint) {
    npctalk_client *c = connect_or_die(endpoint, 3000);
    void *answer = NULL;
    size_t len = 0;
    CHECK(npctalk_call(c, "npc.list", NULL, 0, &answer, &len) == NPCTALK_OK, "npc.list: %s", npctalk_last_error(c));
    msgpack_unpacked reply;
    msgpack_unpacked_init(&reply);
    size_t offset = 0;
    CHECK(msgpack_unpack_next(&reply, answer, len, &offset) == MSGPACK_UNPACK_SUCCESS, "npc.list answer unreadable");
    const msgpack_object *npcs = get(&reply.data, "npcs");
    CHECK(npcs && npcs->type == MSGPACK_OBJECT_ARRAY && npcs->via.array.size >= 3, "npc.list has no npcs list");
    msgpack_unpacked_destroy(&reply);
    npctalk_free(answer);

    msgpack_sbuffer fields;
    msgpack_sbuffer_init(&fields);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &fields, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 1);
    msgpack_pack_str_with_body(&pk, "npc", 3);
    msgpack_pack_str_with_body(&pk, "bram", 4);
    CHECK(npctalk_call(c, "npc.get", fields.data, fields.size, &answer, &len) == NPCTALK_OK, "npc.get: %s",
          npctalk_last_error(c));
    msgpack_unpacked_init(&reply);
    offset = 0;
    CHECK(msgpack_unpack_next(&reply, answer, len, &offset) == MSGPACK_UNPACK_SUCCESS, "npc.get answer unreadable");
    const msgpack_object *persona = get(&reply.data, "persona");
    CHECK(persona && get(persona, "name") && get(persona, "role"), "npc.get has no persona with name and role");
    msgpack_unpacked_destroy(&reply);
    npctalk_free(answer);

    msgpack_sbuffer_clear(&fields);
    msgpack_pack_map(&pk, 1);
    msgpack_pack_str_with_body(&pk, "npc", 3);
    msgpack_pack_str_with_body(&pk, "ghost", 5);
    CHECK(npctalk_call(c, "npc.get", fields.data, fields.size, NULL, NULL) == NPCTALK_E_UNKNOWN_NPC, "ghost found");
    CHECK(strstr(npctalk_last_error(c), "ghost") != NULL, "error: %s", npctalk_last_error(c));
    CHECK(npctalk_call(c, "no.such.op", NULL, 0, NULL, NULL) == NPCTALK_E_UNKNOWN_OP, "unknown op accepted");
    CHECK(npctalk_call(c, "say", NULL, 0, NULL, NULL) == NPCTALK_E_INVALID_ARGUMENT, "say through npctalk_call");

    msgpack_sbuffer_clear(&fields);
    msgpack_pack_map(&pk, 1);
    msgpack_pack_str_with_body(&pk, "id", 2);
    msgpack_pack_str_with_body(&pk, "mine", 4);
    CHECK(npctalk_call(c, "ping", fields.data, fields.size, NULL, NULL) == NPCTALK_E_INVALID_ARGUMENT, "id accepted");
    msgpack_sbuffer_clear(&fields);
    msgpack_pack_array(&pk, 0);
    CHECK(npctalk_call(c, "ping", fields.data, fields.size, NULL, NULL) == NPCTALK_E_INVALID_ARGUMENT, "array accepted");
    CHECK(npctalk_call(c, "stats", NULL, 0, NULL, NULL) == NPCTALK_OK, "stats: %s", npctalk_last_error(c));
    msgpack_sbuffer_destroy(&fields);
    npctalk_close(c);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: api_checks ENDPOINT arguments|concurrent|reentry|close|call|recover|stall|dropped\n");
        return 64;
    }
    const char *endpoint = argv[1], *check = argv[2];
    if (strcmp(check, "arguments") == 0) check_arguments(endpoint);
    else if (strcmp(check, "concurrent") == 0) check_concurrent(endpoint);
    else if (strcmp(check, "reentry") == 0) check_reentry(endpoint);
    else if (strcmp(check, "close") == 0) check_close_in_callback(endpoint);
    else if (strcmp(check, "recover") == 0) check_recover(endpoint);
    else if (strcmp(check, "stall") == 0) check_stall(endpoint);
    else if (strcmp(check, "dropped") == 0) check_dropped(endpoint);
    else if (strcmp(check, "call") == 0) check_call(endpoint);
    else {
        fprintf(stderr, "api_checks: unknown check %s\n", check);
        return 64;
    }
    printf("ok\n");
    return 0;
}
