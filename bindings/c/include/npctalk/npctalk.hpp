// npctalk C++ wrapper (header-only, C++17) over the C client in npctalk.h: RAII, exceptions for
// failed calls, std::function handlers per reply.
//
//   npctalk::Client npc("tcp://127.0.0.1:5555");
//   npc.hello();
//   npctalk::Handlers h;
//   h.on_token = [](std::string_view text, uint32_t) { std::cout << text << std::flush; };
//   h.on_done = [](const npctalk_result& r) { std::cout << "\n(" << r.finish_reason << ")\n"; };
//   npc.say("bram", "Got any iron?", std::move(h));
//   while (npc.running()) npc.poll(16);   // in a game: npc.poll() once per frame
//
// Same threading rules as the C API: one thread per Client. An exception thrown by a handler is
// caught at the C boundary and rethrown from the poll() (or blocking call) that ran the handler.
#ifndef NPCTALK_HPP
#define NPCTALK_HPP

#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "npctalk.h"

namespace npctalk {

// A failed call: status() is the npctalk_status, what() the sentence explaining it.
class Error : public std::runtime_error {
  public:
    Error(npctalk_status status, const std::string& message)
        : std::runtime_error(std::string(npctalk_status_name(status)) + ": " + message), status_(status) {}
    npctalk_status status() const noexcept { return status_; }

  private:
    npctalk_status status_;
};

// What to do with one reply's messages; each may be empty.
struct Handlers {
    std::function<void(std::string_view text, uint32_t seq)> on_token;
    std::function<void(const npctalk_result& result)> on_done;
    std::function<void(npctalk_status status, const std::string& message)> on_error;
};

class Client {
  public:
    explicit Client(const std::string& endpoint = NPCTALK_DEFAULT_ENDPOINT,
                    const npctalk_options& options = npctalk_default_options())
        : state_(std::make_unique<State>()) {
        npctalk_status status = npctalk_connect(endpoint.c_str(), &options, &client_);
        if (status != NPCTALK_OK) throw Error(status, npctalk_connect_error());
    }
    ~Client() { npctalk_close(client_); }
    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;
    Client(Client&& other) noexcept : client_(std::exchange(other.client_, nullptr)), state_(std::move(other.state_)) {}
    Client& operator=(Client&& other) noexcept {
        if (this != &other) {
            npctalk_close(client_);
            client_ = std::exchange(other.client_, nullptr);
            state_ = std::move(other.state_);
        }
        return *this;
    }

    npctalk_server_info hello() {
        npctalk_server_info info{};
        check(npctalk_hello(client_, &info));
        return info;
    }

    void ping() { check(npctalk_ping(client_)); }

    // Returns true when the NPC was created, false when an existing one was replaced.
    bool upsert_npc(const std::string& npc, const npctalk_persona& persona) {
        int created = 0;
        check(npctalk_upsert_npc(client_, npc.c_str(), &persona, &created));
        return created != 0;
    }

    // Starts a reply; its handlers run from poll(). `options` may be null (server defaults).
    npctalk_reply_id say(const std::string& npc, const std::string& text, Handlers handlers,
                         const npctalk_say_options* options = nullptr) {
        auto slot = std::make_unique<Slot>(Slot{std::move(handlers), state_.get(), 0});
        npctalk_callbacks callbacks{&Client::token_cb, &Client::done_cb, &Client::error_cb, slot.get()};
        npctalk_reply_id id = 0;
        check(npctalk_say(client_, npc.c_str(), text.c_str(), options, &callbacks, &id));
        slot->id = id;
        state_->slots.emplace(id, std::move(slot));  // no callback can run before the next poll()
        return id;
    }

    void cancel(npctalk_reply_id reply) { check(npctalk_cancel(client_, reply)); }

    // Receive and run handlers; waits at most timeout_ms for the first message (0: never waits).
    void poll(int timeout_ms = 0) { check(npctalk_poll(client_, timeout_ms)); }

    std::size_t running() const { return npctalk_running(client_); }
    npctalk_client* get() const noexcept { return client_; }

  private:
    struct State;
    struct Slot {
        Handlers handlers;
        State* state;
        npctalk_reply_id id;
    };
    struct State {
        std::unordered_map<npctalk_reply_id, std::unique_ptr<Slot>> slots;
        std::exception_ptr pending;  // thrown by a handler, rethrown after the C call returns
    };

    void check(npctalk_status status) {
        if (state_ && state_->pending) std::rethrow_exception(std::exchange(state_->pending, nullptr));
        if (status != NPCTALK_OK) throw Error(status, npctalk_last_error(client_));
    }

    // The slot leaves the map before its last handler runs, and is freed when that handler returns.
    static std::unique_ptr<Slot> take(void* user) {
        Slot* slot = static_cast<Slot*>(user);
        auto found = slot->state->slots.find(slot->id);
        if (found == slot->state->slots.end()) return nullptr;
        std::unique_ptr<Slot> owned = std::move(found->second);
        slot->state->slots.erase(found);
        return owned;
    }

    static void token_cb(void* user, npctalk_reply_id, const char* text, size_t len, uint32_t seq) {
        Slot* slot = static_cast<Slot*>(user);
        try {
            if (slot->handlers.on_token) slot->handlers.on_token(std::string_view(text, len), seq);
        } catch (...) {
            slot->state->pending = std::current_exception();
        }
    }

    static void done_cb(void* user, const npctalk_result* result) {
        std::unique_ptr<Slot> slot = take(user);
        if (!slot) return;
        try {
            if (slot->handlers.on_done) slot->handlers.on_done(*result);
        } catch (...) {
            slot->state->pending = std::current_exception();
        }
    }

    static void error_cb(void* user, npctalk_reply_id, npctalk_status status, const char* message) {
        std::unique_ptr<Slot> slot = take(user);
        if (!slot) return;
        try {
            if (slot->handlers.on_error) slot->handlers.on_error(status, message);
        } catch (...) {
            slot->state->pending = std::current_exception();
        }
    }

    npctalk_client* client_ = nullptr;
    std::unique_ptr<State> state_;
};

}  // namespace npctalk

#endif  // NPCTALK_HPP
