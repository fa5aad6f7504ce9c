// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title Hostile test token (tests only, never deployed outside a test chain)
/// @notice An ERC20 that, once armed, calls an arbitrary target in the middle of every
/// transfer, so tests can check that the Centralizer refuses re-entrant calls. The
/// revert of the inner call is bubbled up unchanged.
contract ReentrantToken is ERC20 {
    address public target;
    bytes public payload;

    constructor(uint256 supply) ERC20("Reentrant", "REENT") {
        _mint(msg.sender, supply);
    }

    /// @notice Arms the hook: the next transfers call `target_` with `payload_`.
    function arm(address target_, bytes calldata payload_) external {
        target = target_;
        payload = payload_;
    }

    function _update(address from, address to, uint256 value) internal override {
        super._update(from, to, value);
        address t = target;
        if (t != address(0)) {
            target = address(0); // one shot, so the inner call cannot recurse forever
            (bool ok, bytes memory ret) = t.call(payload);
            if (!ok) {
                assembly ("memory-safe") {
                    revert(add(ret, 0x20), mload(ret))
                }
            }
        }
    }
}
